"""What a GPU user of SAK depends on, checked in one command with a JSON report (run it through bench/gpu_check.sh).

    bash bench/gpu_check.sh [--reduced] [--compile] [--output bench/results/gpu_check_<device>.json]

Checks (each records "passed", "failed" or "skipped" with a reason, its criteria and its numbers):

- `train_fp16`, `train_bf16`: stage-2 training steps on one fixed batch through a real `accelerate.Accelerator`
  (`mixed_precision` fp16 with its GradScaler, or bf16), bfloat16 teachers with `fast_path=True` where the teachers
  have it, as `train_accelerate.py` runs them: finite losses, the last loss below the first, every parameter that
  received a gradient changed, autocast active at the requested dtype, float32 master weights and gradients. On a CPU
  accelerate applies no fp16 autocast and no scaler, so there the same is done by hand (`torch.autocast` + a
  `torch.amp.GradScaler`), as accelerate does on a GPU.
- `ddp_2proc`: one 2-process DDP step via torchrun (NCCL on two GPUs; gloo on a machine without a GPU; skipped on a
  machine with one GPU): finite losses and identical replicas after the step.
- `fsdp2_2proc`: the student sharded with FSDP2 over 2 processes (`modeling_sak.training.sharding`, as `train_accelerate.py
  --distributed_strategy fsdp2` runs it; full mode: ViT-L with the large committee at 448x576, batch 2): a step, a
  sharded checkpoint, the next step, and that step again in a fresh sharded student and optimizer loaded from the
  checkpoint: finite losses, the resumed step's loss and parameters bit for bit the original's, the gathered copy
  whole; with the first step's time and rank 0's peak GPU memory (compare bench/results/memory.json).
- `inference_speed`: eager float32 vs `optimize_for_inference()` (bf16) at batch 1 and 8: times, speed-up, relative
  error of the task outputs.
- `peak_memory`: one stage-2 step of the ViT-B and of the ViT-L configuration (each with its committee: base or large
  teachers), bf16, each in a fresh process (`torch.cuda.max_memory_allocated`, or the peak resident memory on CPU).
- `torch_compile`: `optimize_for_inference(compile=True)` against the same without compile: compile time, speed,
  agreement (skipped on CPU in reduced mode unless `--compile`: inductor's C++ build adds tens of seconds to minutes
  there, more than the rest of the reduced check).

Full mode (default on a CUDA machine): ViT-B/16 with DINOv2-B, CLIP-B, SAM-B shaped teachers at 448x576, batch 2;
peak memory of ViT-B and ViT-L; meant to take under 5 minutes on one GPU (not yet run on one: no GPU was lent to this
project). Reduced mode (automatic without CUDA, or `--reduced`): 4-block width-32 students and teachers at 64x96
(widths 32 and 64 for the memory check), 6 steps; about a minute on two quiet cores, three when they are shared. All
models have random weights built from configs at a realistic initialisation (nothing is downloaded). The exit status
is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from train_step import (
    REPO_ROOT,
    WIDTHS,
    build_student,
    build_teachers,
    nyud_labels,
    peak_memory_mib,
    stage2_step,
    synchronize,
    teacher_configs,
)


CHECKS = ("train_fp16", "train_bf16", "ddp_2proc", "fsdp2_2proc", "inference_speed", "peak_memory", "torch_compile")
SETTINGS = {
    "full": {
        "shape": "base",
        "image_size": [448, 576],
        "batch": 2,
        "steps": 8,
        "learning_rate": 1e-4,
        "inference_size": [448, 576],
        "inference_repeats": 5,
        "memory": {"vit_base": {"shape": "base"}, "vit_large": {"shape": "large"}},
        "memory_size": [448, 576],
        "fsdp2_shape": "large",  # ViT-L with the large committee, sharded over the two GPUs
    },
    "reduced": {
        "shape": "tiny",
        "image_size": [64, 96],
        "batch": 2,
        "steps": 6,  # fp16's GradScaler skips the first steps while it finds its scale (65536 -> 16384 here)
        "learning_rate": 1e-3,
        "inference_size": [64, 96],
        "inference_repeats": 3,
        # ViT-B/L students and committees take minutes to build on two cores: two tiny widths show the mechanism.
        "memory": {"tiny": {"shape": "tiny"}, "tiny64": {"shape": "tiny64"}},
        "memory_size": [64, 96],
        "fsdp2_shape": "tiny",
    },
}
INFERENCE_BATCHES = (1, 8)
# bf16 against fp32: ~1e-2 relative error on ViT-B (bench/speed.py); compiled bf16 against eager bf16 differs by the
# order of its roundings only: both bounds catch a broken path, not rounding.
MAX_RELATIVE_ERROR = {"fast": 5e-2, "compile": 5e-2}
SEED = 0


# ------------------------------------------------------------------------------------------------- in a subprocess
def fixed_batch(settings: dict, device: torch.device, seed: int = SEED) -> tuple[torch.Tensor, dict]:
    size, batch = settings["image_size"], settings["batch"]
    pixel_values = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    labels = {k: v.to(device) for k, v in nyud_labels(batch, *size, seed=seed + 3).items()}
    return pixel_values, labels


def stage2_models(
    image_size: list[int], device: torch.device, shape: str, depth: int | None = None, sam_size: int | None = None
) -> tuple:
    """A training-mode student of `shape` for `image_size` and its bf16 committee (fast_path=True where the teachers
    have it), built on `device`; and whether the fast teacher path was available."""
    with torch.device(device):
        model = build_student(shape, tuple(image_size), WIDTHS[shape][0], depth=depth, seed=SEED).train()
    configs = teacher_configs(shape, depth=depth, sam_size=sam_size)
    teachers, fast = build_teachers(configs, torch.bfloat16, fast_path=True, device=device, seed=SEED + 2)
    return model, teachers, fast


def train_worker(job: dict) -> dict:
    """`steps` stage-2 steps on one fixed batch in `precision` (fp16 or bf16), as train_accelerate.py runs them."""
    from accelerate import Accelerator

    from modeling_sak.training.optimization import make_optimizer

    precision, settings = job["precision"], job["settings"]
    device = torch.device(job["device"])
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    # accelerate applies no fp16 autocast and no GradScaler on a CPU: there we do by hand what it does on a GPU.
    by_hand = precision == "fp16" and device.type == "cpu"
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no" if by_hand else precision)
    model, teachers, fast = stage2_models(settings["image_size"], accelerator.device, settings["shape"])
    base_optimizer = make_optimizer(model, settings["learning_rate"], 1e-6)  # fused AdamW, as train_accelerate.py
    model, optimizer = accelerator.prepare(model, base_optimizer)
    scaler = torch.amp.GradScaler(device.type) if by_hand else accelerator.scaler
    autocast_by_hand = torch.autocast(device.type, dtype=amp_dtype) if by_hand else contextlib.nullcontext()
    student = accelerator.unwrap_model(model)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    pixel_values, labels = fixed_batch(settings, accelerator.device)

    seen = {}  # the dtype the first stem projection computes in: proves autocast is on

    def record_dtype(module, args, output) -> None:
        seen.setdefault("stem_matmul", str(output.dtype))

    hook = student.stem.layers[0].attention.qkv.register_forward_hook(record_dtype)
    losses, skipped, received, gradient_dtypes, feature_dtypes = [], 0, set(), set(), set()
    step, phase, error = 0, "", None
    try:
        for step in range(settings["steps"]):
            phase = "teachers (under accelerator.autocast(), as train_accelerate.py runs them)"
            with accelerator.autocast(), autocast_by_hand:
                teacher_features = teachers(pixel_values)
            feature_dtypes |= {str(level.dtype) for levels in teacher_features.values() for level in levels}
            phase = "student forward"
            torch.manual_seed(SEED + 4)  # the same gating noise every step: the loss changes only with the weights
            with autocast_by_hand:
                outputs = model(pixel_values, labels=labels, teacher_features=teacher_features)
            losses.append(outputs.loss.item())
            phase = "backward"
            if by_hand:
                scaler.scale(outputs.loss).backward()
            else:
                accelerator.backward(outputs.loss)
            if step == 0:
                received = {name for name, p in student.named_parameters() if p.grad is not None}
                gradient_dtypes = {str(p.grad.dtype) for p in student.parameters() if p.grad is not None}
            phase = "clip and optimizer step"
            if by_hand:
                scaler.unscale_(base_optimizer)
                torch.nn.utils.clip_grad_norm_(student.parameters(), 10.0)
                scale = scaler.get_scale()
                scaler.step(base_optimizer)
                scaler.update()
                skipped += scaler.get_scale() < scale
            else:
                accelerator.clip_grad_norm_(model.parameters(), 10.0)
                optimizer.step()
                skipped += bool(optimizer.step_was_skipped)
            optimizer.zero_grad(set_to_none=True)
    except Exception as caught:  # recorded with where it happened: the report says what a GPU user would hit
        error = {
            "step": step + 1,
            "phase": phase,
            "error": f"{type(caught).__name__}: {caught}",
            "traceback": traceback.format_exc()[-3000:],
        }
    hook.remove()
    after = dict(student.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    unchanged_with_gradient = sorted(received - changed)
    finite = all(torch.isfinite(torch.tensor(losses)).tolist())
    parameter_dtypes = sorted({str(p.dtype) for p in student.parameters()})
    return {
        "precision": precision,
        "mixed_precision_by": "torch.autocast + torch.amp.GradScaler by hand (accelerate applies neither on CPU)"
        if by_hand
        else f"accelerate.Accelerator(mixed_precision={precision!r})",
        "grad_scaler": type(scaler).__name__ if scaler is not None else None,
        "final_grad_scale": scaler.get_scale() if scaler is not None else None,
        "losses": losses,
        "skipped_steps": int(skipped),
        "parameters": len(before),
        "parameters_with_gradients": len(received),
        "parameters_changed": len(changed),
        "unchanged_with_gradient": unchanged_with_gradient[:10],
        "max_abs_change": max((after[n].detach() - before[n]).abs().max().item() for n in before),
        "stem_matmul_dtype": seen.get("stem_matmul"),
        "parameter_dtypes": parameter_dtypes,
        "gradient_dtypes": sorted(gradient_dtypes),
        "teacher_feature_dtypes": sorted(feature_dtypes),
        "teacher_dtype": str(next(teachers.teachers.parameters()).dtype),
        "fast_teacher_path_available": fast,
        "peak_memory_mib": peak_memory_mib(accelerator.device),
        "error": error,
        "criteria": {
            "no_errors": error is None,
            "losses_finite": bool(losses) and finite,
            "loss_decreased": len(losses) > 1 and finite and losses[-1] < losses[0],
            "optimizer_stepped": skipped < len(losses),
            "parameters_updated": bool(received) and not unchanged_with_gradient,
            "autocast_active": seen.get("stem_matmul") == str(amp_dtype),
            "float32_master_weights_and_gradients": parameter_dtypes == ["torch.float32"]
            and sorted(gradient_dtypes) == ["torch.float32"],
        },
    }


def ddp_worker(job: dict) -> dict | None:
    """One stage-2 step in each of the torchrun processes (different data per rank); rank 0 reports."""
    from accelerate import Accelerator

    from modeling_sak.training.optimization import make_optimizer
    from modeling_sak.training.sharding import distributed_without_gpu

    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    accelerator = Accelerator(cpu=distributed_without_gpu(), mixed_precision="bf16")
    settings = job["settings"]
    model, teachers, _ = stage2_models(settings["image_size"], accelerator.device, settings["shape"])
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # as train_accelerate.py
    before = torch.stack([p.detach().double().sum() for p in model.parameters()])
    optimizer = make_optimizer(model, settings["learning_rate"], 1e-6)
    model, optimizer = accelerator.prepare(model, optimizer)
    pixel_values, labels = fixed_batch(settings, accelerator.device, seed=SEED + 10 * accelerator.process_index)
    loss, parts = stage2_step(model, teachers, optimizer, accelerator, pixel_values, labels, SEED + 4)
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()])
    gathered = accelerator.gather(checksum[None]).cpu()
    losses = accelerator.gather(torch.tensor([loss], device=accelerator.device)).cpu().tolist()
    result = {
        "processes": accelerator.num_processes,
        "backend": str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None,
        "device": str(accelerator.device),
        "losses": losses,
        "step_seconds": sum(parts.values()),
        "criteria": {
            "two_processes": accelerator.num_processes == 2,
            "losses_finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
            "ranks_saw_different_data": len(set(losses)) == len(losses),
            "replicas_identical": bool((gathered == gathered[0]).all()),
            "parameters_updated": not torch.equal(checksum.cpu(), before.cpu()),
        },
    }
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result if accelerator.is_main_process else None


def fsdp2_worker(job: dict) -> dict | None:
    """An FSDP2 step, a sharded checkpoint, the next step, and that step again from the checkpoint in a fresh sharded
    student and optimizer, in each of the torchrun processes, through `modeling_sak.training.sharding` as `train_accelerate.py
    --distributed_strategy fsdp2` runs it; rank 0 reports."""
    from accelerate import Accelerator

    from modeling_sak.training.optimization import make_optimizer
    from modeling_sak.training.sharding import (
        distributed_without_gpu,
        gather_student,
        load_sharded,
        save_sharded,
        shard_student,
    )

    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    accelerator = Accelerator(cpu=distributed_without_gpu(), mixed_precision="bf16")
    settings, device = job["settings"], accelerator.device
    shape = settings["fsdp2_shape"]

    def sharded_student():
        model, teachers, _ = stage2_models(settings["image_size"], device, shape)
        if accelerator.num_processes > 1 and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # as train_accelerate.py
        model = shard_student(model, device, "bf16")
        return model, teachers, make_optimizer(model, settings["learning_rate"], 1e-6)

    def step(model, teachers, optimizer, index: int) -> float:
        pixel_values, labels = fixed_batch(settings, device, seed=SEED + 10 * accelerator.process_index + index)
        with accelerator.autocast():
            teacher_features = teachers(pixel_values)
            torch.manual_seed(SEED + index)  # the same gating noise in both runs of a step
            outputs = model(pixel_values, labels=labels, teacher_features=teacher_features)
        accelerator.backward(outputs.loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return outputs.loss.item()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, teachers, optimizer = sharded_student()
    synchronize(device)
    start = time.perf_counter()
    first = step(model, teachers, optimizer, 0)
    synchronize(device)
    step_seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    save_sharded(model, optimizer, job["directory"])
    second = step(model, teachers, optimizer, 1)
    again, _, optimizer_again = sharded_student()
    load_sharded(again, optimizer_again, job["directory"])
    resumed = step(again, teachers, optimizer_again, 1)
    same = all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(model.parameters(), again.parameters()))
    same = bool(accelerator.reduce(torch.tensor([float(same)], device=device), "min").item())
    width = WIDTHS[shape][0]
    plain = gather_student(
        model, lambda: build_student(shape, tuple(settings["image_size"]), width, seed=SEED), device
    )
    losses = accelerator.gather(torch.tensor([first, second, resumed], device=device)[None]).cpu().tolist()
    result = {
        "processes": accelerator.num_processes,
        "backend": str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None,
        "device": str(device),
        "shape": shape,
        "losses_per_rank": losses,
        "first_step_seconds": step_seconds,
        "peak_memory_GiB_rank0": peak,
        "criteria": {
            "two_processes": accelerator.num_processes == 2,
            "losses_finite": all(torch.isfinite(torch.tensor(losses)).flatten().tolist()),
            "resumed_step_equals_the_original": all(row[1] == row[2] for row in losses),
            "resumed_parameters_bit_identical": same,
            "gathered_whole_student": sum(p.numel() for p in plain.parameters())
            == sum(p.numel() for p in model.parameters()),  # a DTensor's numel is the whole parameter's
        },
    }
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result if accelerator.is_main_process else None


def memory_worker(job: dict) -> dict:
    """One bf16 stage-2 step of a configuration in this fresh process: its peak memory."""
    from accelerate import Accelerator

    from modeling_sak.training.optimization import make_optimizer

    settings = job["settings"]
    accelerator = Accelerator(cpu=job["device"] == "cpu", mixed_precision="bf16")
    model, teachers, _ = stage2_models(settings["memory_size"], accelerator.device, **job["shape"])
    parameters = sum(p.numel() for p in model.parameters())
    teacher_parameters = sum(p.numel() for p in teachers.teachers.parameters())
    optimizer = make_optimizer(model, settings["learning_rate"], 0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = {**settings, "image_size": settings["memory_size"]}
    pixel_values, labels = fixed_batch(batch, accelerator.device)
    loss, parts = stage2_step(model, teachers, optimizer, accelerator, pixel_values, labels, SEED + 4)
    return {
        "configuration": job["shape"],
        "input": f"batch {settings['batch']} at {settings['memory_size'][0]}x{settings['memory_size'][1]}",
        "student_parameters_m": parameters / 1e6,
        "teacher_parameters_m": teacher_parameters / 1e6,
        "peak_memory_mib": peak_memory_mib(accelerator.device),
        "memory_kind": "torch.cuda.max_memory_allocated"
        if accelerator.device.type == "cuda"
        else "peak resident memory (ru_maxrss) of the process",
        "loss": loss,
        "step_seconds": sum(parts.values()),
        "criteria": {"loss_finite": bool(torch.isfinite(torch.tensor(loss)))},
    }


WORKERS = {"train": train_worker, "ddp": ddp_worker, "fsdp2": fsdp2_worker, "memory": memory_worker}


# ---------------------------------------------------------------------------------------------- in this process
def timed_inference(model, pixel_values: torch.Tensor, repeats: int) -> tuple[dict, float, list[float]]:
    """Task outputs (float32, on the CPU), the first call's seconds and `repeats` timed calls' seconds."""
    device = pixel_values.device
    with torch.inference_mode():
        synchronize(device)
        start = time.perf_counter()
        outputs = model(pixel_values).task_outputs
        synchronize(device)
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(pixel_values)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return {task: value.float().cpu() for task, value in outputs.items()}, first, times


def relative_errors(outputs: dict, reference: dict) -> dict[str, float]:
    return {task: ((outputs[task] - value).norm() / value.norm()).item() for task, value in reference.items()}


def all_finite(outputs: dict) -> bool:
    return all(bool(torch.isfinite(value).all()) for value in outputs.values())


def inference_model(settings: dict, device: torch.device):
    with torch.device(device):
        name = settings["shape"]
        return build_student(name, tuple(settings["inference_size"]), WIDTHS[name][0], seed=SEED).eval()


def check_inference_speed(settings: dict, device: torch.device, full: bool) -> dict:
    """Eager float32 vs `optimize_for_inference()` (bf16) at batch 1 and 8."""
    eager = inference_model(settings, device)
    fast = copy.deepcopy(eager).optimize_for_inference()
    rows, criteria = {}, {}
    for batch in INFERENCE_BATCHES:
        generator = torch.Generator().manual_seed(SEED + batch)
        pixel_values = torch.randn(batch, 3, *settings["inference_size"], generator=generator).to(device)
        reference, _, eager_times = timed_inference(eager, pixel_values, settings["inference_repeats"])
        outputs, _, fast_times = timed_inference(fast, pixel_values, settings["inference_repeats"])
        errors = relative_errors(outputs, reference)
        agreement = (outputs["semseg"].argmax(1) == reference["semseg"].argmax(1)).float().mean().item()
        rows[f"batch {batch}"] = {
            "eager_fp32_seconds": statistics.median(eager_times),
            "fast_bf16_seconds": statistics.median(fast_times),
            "speedup": statistics.median(eager_times) / statistics.median(fast_times),
            "relative_error": errors,
            "semseg_argmax_agreement": agreement,
        }
        criteria[f"batch {batch}: outputs finite"] = all_finite(reference) and all_finite(outputs)
        criteria[f"batch {batch}: relative error < {MAX_RELATIVE_ERROR['fast']}"] = (
            max(errors.values()) < MAX_RELATIVE_ERROR["fast"]
        )
    if full:  # a GPU saturated by batch 8 must run bf16 faster than fp32
        criteria["batch 8: fast path faster"] = rows["batch 8"]["speedup"] > 1.0
    return {"input_size": settings["inference_size"], "results": rows, "criteria": criteria}


def check_torch_compile(settings: dict, device: torch.device) -> dict:
    """`optimize_for_inference(compile=True)` against `optimize_for_inference()` at batch 1."""
    plain = inference_model(settings, device)
    compiled = copy.deepcopy(plain).optimize_for_inference(compile=True)
    plain.optimize_for_inference()
    pixel_values = torch.randn(1, 3, *settings["inference_size"], generator=torch.Generator().manual_seed(SEED))
    pixel_values = pixel_values.to(device)
    reference, _, plain_times = timed_inference(plain, pixel_values, settings["inference_repeats"])
    outputs, first, compiled_times = timed_inference(compiled, pixel_values, settings["inference_repeats"])
    errors = relative_errors(outputs, reference)
    return {
        "compile_and_first_call_seconds": first,
        "without_compile_seconds": statistics.median(plain_times),
        "with_compile_seconds": statistics.median(compiled_times),
        "speedup": statistics.median(plain_times) / statistics.median(compiled_times),
        "relative_error_vs_without_compile": errors,
        "criteria": {
            "outputs finite": all_finite(outputs),
            f"relative error < {MAX_RELATIVE_ERROR['compile']}": max(errors.values()) < MAX_RELATIVE_ERROR["compile"],
        },
    }


# ---------------------------------------------------------------------------------------------------------- parent
def worker_command(kind: str, job: dict, result_path: str, launcher: list[str] | None = None) -> list[str]:
    return [
        *(launcher or [sys.executable]),
        __file__,
        "--worker",
        kind,
        "--job",
        json.dumps(job),
        "--result",
        result_path,
    ]


def start_worker(kind: str, job: dict, threads: int | None, launcher: list[str] | None = None):
    """A worker subprocess writing its JSON result to a temporary file; returns (process, result path, log)."""
    handle, result_path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    log = tempfile.TemporaryFile("w+")
    env = dict(os.environ)
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    process = subprocess.Popen(
        worker_command(kind, job, result_path, launcher), stdout=log, stderr=subprocess.STDOUT, env=env
    )
    return process, result_path, log


def finish_worker(process, result_path: str, log, started: float) -> dict:
    """The worker's result as a check record (status from its criteria), or a failure with the log's tail."""
    code = process.wait()
    log.seek(0)
    output = log.read()
    log.close()
    text = Path(result_path).read_text()
    os.unlink(result_path)
    if code != 0 or not text:
        return {"status": "failed", "error": f"worker exited with {code}", "log_tail": output[-4000:]}
    record = json.loads(text)
    return as_check(record, time.perf_counter() - started)


def run_workers(workers: dict[str, tuple], parallel: bool, threads: int | None) -> dict[str, dict]:
    """Run `{name: (kind, job[, launcher])}` worker processes, side by side or one after the other."""
    records = {}
    if parallel:
        running = {
            name: (start_worker(*worker[:2], threads, *worker[2:]), time.perf_counter())
            for name, worker in workers.items()
        }
        for name, (started_worker, begun) in running.items():
            records[name] = finish_worker(*started_worker, begun)
        return records
    for name, worker in workers.items():
        begun = time.perf_counter()
        records[name] = finish_worker(*start_worker(*worker[:2], threads, *worker[2:]), begun)
    return records


def as_check(record: dict, seconds: float) -> dict:
    failed = sorted(name for name, ok in record.get("criteria", {}).items() if not ok)
    return {"status": "failed" if failed else "passed", "failed_criteria": failed, "seconds": seconds, **record}


def run_in_process(function, *args) -> dict:
    started = time.perf_counter()
    try:
        return as_check(function(*args), time.perf_counter() - started)
    except Exception as error:  # a check that raises fails with its traceback; the others still run
        return {"status": "failed", "error": repr(error), "traceback": traceback.format_exc()[-4000:]}


def machine(device: torch.device) -> dict:
    import accelerate
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "logical_cpus": os.cpu_count(),
        "cuda_devices": torch.cuda.device_count(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="the reduced check (automatic without CUDA)")
    parser.add_argument("--compile", action="store_true", help="run the torch.compile check in reduced mode too")
    parser.add_argument("--output", help="JSON report (default: bench/results/gpu_check_<device>.json)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = WORKERS[args.worker](json.loads(args.job))
        if result is not None:
            Path(args.result).write_text(json.dumps(result))
        return

    started_at = datetime.now(timezone.utc)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reduced = args.reduced or device.type != "cuda"
    mode = "reduced" if reduced else "full"
    settings = SETTINGS[mode]
    output = Path(args.output or REPO_ROOT / "bench" / "results" / f"gpu_check_{device.type}.json")
    print(f"gpu_check: {mode} mode on {device}" + ("" if device.type == "cuda" else " (no CUDA device)"), flush=True)
    # Reduced mode on a CPU runs the independent worker processes side by side, one thread each, to finish in about a
    # minute; on a GPU they run one after the other so that each has the device alone.
    parallel = device.type == "cpu"
    threads = 1 if parallel else None
    if parallel:  # this process's inference timings too: tiny models, and no oversubscribed cores
        torch.set_num_threads(1)
    checks: dict[str, dict] = {}

    job = {"settings": settings, "device": device.type}
    workers = {f"train_{precision}": ("train", job | {"precision": precision}) for precision in ("fp16", "bf16")}
    workers |= {f"memory {name}": ("memory", job | {"shape": shape}) for name, shape in settings["memory"].items()}
    begun = time.perf_counter()
    results = run_workers(workers, parallel, threads)
    checks["train_fp16"], checks["train_bf16"] = results.pop("train_fp16"), results.pop("train_bf16")
    memory = {name.split(" ", 1)[1]: result for name, result in results.items()}
    checks["peak_memory"] = {
        "status": "failed" if any(r["status"] == "failed" for r in memory.values()) else "passed",
        "seconds": time.perf_counter() - begun,
        "configurations": memory,
    }
    for name in ("train_fp16", "train_bf16", "peak_memory"):
        print(f"  {name}: {checks[name]['status']}", flush=True)

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        checks["ddp_2proc"] = {
            "status": "skipped",
            "reason": f"needs two GPUs; this machine has {torch.cuda.device_count()}",
        }
    else:
        checks["ddp_2proc"] = run_workers({"ddp": ("ddp", job, launcher)}, False, threads)["ddp"]
    print(f"  ddp_2proc: {checks['ddp_2proc']['status']}", flush=True)
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        checks["fsdp2_2proc"] = {
            "status": "skipped",
            "reason": f"needs two GPUs; this machine has {torch.cuda.device_count()}",
        }
    else:
        with tempfile.TemporaryDirectory() as directory:
            fsdp2_job = job | {"directory": str(Path(directory) / "sharded")}
            checks["fsdp2_2proc"] = run_workers({"fsdp2": ("fsdp2", fsdp2_job, launcher)}, False, threads)["fsdp2"]
    print(f"  fsdp2_2proc: {checks['fsdp2_2proc']['status']}", flush=True)

    checks["inference_speed"] = run_in_process(check_inference_speed, settings, device, mode == "full")
    print(f"  inference_speed: {checks['inference_speed']['status']}", flush=True)
    if device.type == "cpu" and reduced and not args.compile:
        checks["torch_compile"] = {
            "status": "skipped",
            "reason": "reduced mode on CPU: inductor's C++ build would take longer than the other checks; pass --compile",
        }
    else:
        checks["torch_compile"] = run_in_process(check_torch_compile, settings, device)
    print(f"  torch_compile: {checks['torch_compile']['status']}", flush=True)

    failed = sorted(name for name, check in checks.items() if check["status"] == "failed")
    report = {
        "date": started_at.isoformat(timespec="seconds"),
        "command": ("bash bench/gpu_check.sh " + " ".join(sys.argv[1:])).strip(),
        "mode": mode,
        "device": device.type,
        "machine": machine(device),
        "settings": settings,
        "passed": not failed,
        "failed_checks": failed,
        "wall_seconds": time.perf_counter() - started,
        "checks": {name: checks[name] for name in CHECKS},
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}; report: {output}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
