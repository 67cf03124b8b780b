"""Fast SAK on CPU: inference and a stage-2 training step, float32 eager vs the fast path, side by side in one run.

    python bench/speed.py [--threads 2] [--rounds 2] [--repeats 3] [--compile]
                          [--trained_model outputs/sak-toyrooms/final]

A ViT-B/16 SAK student with three teachers of DINOv2-B / CLIP-B / SAM-B shape and the four NYUD-v2 tasks (semseg 40,
normals 3, edge 1, depth 1) is built from transformers configs with random weights (seeded, identical in every
configuration; nothing is downloaded). Every configuration runs in a fresh subprocess, so its peak resident memory
(`ru_maxrss`) is its own; configurations alternate over `--rounds` rounds of `--repeats` timed runs each (after one
warm-up run), and the median over all timed runs is reported.

(a) inference at 448x576, batch 1 and 4: `fp32` (the default eager path), `fp32-plain-heads` (the same with
    `head_implementation="plain"`: resize, then conv, as the reference), `fp32+autocast` (eager under bf16 autocast),
    `fast-fp32` (`optimize_for_inference(dtype=None)`: the exact reorganisations alone), `fast` (`optimize_for_inference()`,
    bfloat16), and with `--compile` `fast+compile` (compile time reported separately);
(b) a stage-2 training step (3 teachers under inference mode + student forward/backward + gradient clipping + AdamW
    step) at `--train_size` (default 224x288; SAM still sees its native 1024x1024 input), batch `--train_batch`:
    `fp32`, `bf16-teachers`, `bf16-teachers+autocast` (bf16 autocast as accelerate's mixed_precision="bf16" applies
    it);
(c) peak memory per configuration;
(d) FLOPs counted with `torch.utils.flop_counter.FlopCounterMode`, and the achieved rate against this machine's
    large-matmul rate in float32 and bfloat16 (measured first, `--threads` threads);
(e) accuracy against float32: relative error of every task output, semseg argmax agreement (overall and where the
    float32 top-2 logit margin exceeds 0.1: random weights make many near-ties), the training loss and gradients;
    with `--trained_model` also on a trained checkpoint (e.g. the default ToyRooms run) over rendered ToyRooms scenes.
Per-component times (stem, adapters, routers, heads; teachers, forward, backward, optimizer) come from the same runs.
Results go to bench/results/speed.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.utils.flop_counter


INFERENCE_VARIANTS = ("fp32", "fp32-plain-heads", "fp32+autocast", "fast-fp32", "fast")
TRAINING_VARIANTS = ("fp32", "bf16-teachers", "bf16-teachers+autocast")
TEACHERS = ("dinov2", "clip", "sam")


# ----------------------------------------------------------------------------------------------------------- models
def build_student(image_size: tuple[int, int], seed: int, head_implementation: str = "low_resolution"):
    from modeling_sak import SAKConfig, SAKForMultiTask

    torch.manual_seed(seed)
    config = SAKConfig(
        teachers=dict.fromkeys(TEACHERS, 768),
        tasks="nyud_v2",
        image_size=list(image_size),
        head_implementation=head_implementation,
    )
    return SAKForMultiTask(config)


def build_teachers(seed: int, dtype: torch.dtype):
    """DINOv2-B/14, CLIP-B/16 and SAM-B (1024 x 1024, windowed attention) shaped teachers with random weights."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        SamVisionConfig,
        SamVisionModel,
    )

    from modeling_sak.teachers.committee import SAKTeacher, SAKTeachers

    torch.manual_seed(seed)
    base = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}
    models = {
        "dinov2": (Dinov2Model(Dinov2Config(**base, image_size=518, patch_size=14)), "dinov2"),
        "clip": (
            CLIPVisionModel(CLIPVisionConfig(**base, intermediate_size=3072, image_size=224, patch_size=16)),
            "clip",
        ),
        "sam": (
            SamVisionModel(
                SamVisionConfig(
                    **base,
                    mlp_dim=3072,
                    image_size=1024,
                    patch_size=16,
                    window_size=14,
                    global_attn_indexes=[2, 5, 8, 11],
                    initializer_range=0.02,
                )
            ),
            "sam",
        ),
    }
    return SAKTeachers(
        {name: SAKTeacher(name, model.to(dtype).eval(), family, None) for name, (model, family) in models.items()}
    )


def nyud_labels(batch: int, height: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    semseg = torch.randint(0, 40, (batch, height, width), generator=generator)
    normals = torch.nn.functional.normalize(torch.randn(batch, 3, height, width, generator=generator), dim=1)
    edge = (torch.rand(batch, 1, height, width, generator=generator) > 0.9).float()
    depth = torch.rand(batch, 1, height, width, generator=generator) * 5 + 0.5
    return {"semseg": semseg, "normals": normals, "edge": edge, "depth": depth}


class ComponentTimer:
    """Wall time spent inside groups of modules, from forward pre/post hooks."""

    def __init__(self, groups: dict[str, list[torch.nn.Module]]):
        self.totals = dict.fromkeys(groups, 0.0)
        self.handles = []
        for name, modules in groups.items():
            for module in modules:
                self.handles.append(module.register_forward_pre_hook(self._start))
                self.handles.append(module.register_forward_hook(self._stop(name)))

    def _start(self, module, args):
        module._bench_start = time.perf_counter()

    def _stop(self, name):
        def hook(module, args, output):
            self.totals[name] += time.perf_counter() - module._bench_start

        return hook

    def take(self) -> dict[str, float]:
        totals, self.totals = self.totals, dict.fromkeys(self.totals, 0.0)
        return totals


def student_groups(model) -> dict[str, list[torch.nn.Module]]:
    return {
        "stem": [model.stem],
        "adapters": list(model.teacher_paths.values()),
        "routers": [router for routers in model.routers.values() for router in routers],
        "heads": list(model.heads.values()),
    }


# FLOPs of one bilinear output value: four weighted inputs (4 multiplies, 3 adds, counted as 4 multiply-adds); the
# backward scatters each output gradient to four inputs at the same cost. torch's counter has no formula for either.
BILINEAR_FLOPS_PER_OUTPUT = 8


def flop_counter():
    """`FlopCounterMode` that also counts what torch's registry lacks on the CPU: the flash-attention kernels (as
    torch counts the CUDA ones) and bilinear resizing with its backward (`BILINEAR_FLOPS_PER_OUTPUT` per output
    value of the forward). Everything else heavy (matmuls, convolutions, their backwards) torch counts itself."""
    import math

    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    def bilinear(*args, out_shape=None, **kwargs) -> int:
        return BILINEAR_FLOPS_PER_OUTPUT * math.prod(out_shape)

    def bilinear_backward(grad_output, *args, out_shape=None, **kwargs) -> int:
        return BILINEAR_FLOPS_PER_OUTPUT * math.prod(grad_output)

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: attention,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward,
        aten.upsample_bilinear2d: bilinear,
        aten.upsample_bilinear2d_backward: bilinear_backward,
    }
    return FlopCounterMode(display=False, custom_mapping=mapping)


def timing_result(
    times: list[float], usage: list[tuple[float, float]], warmup: float, rss_model: float, rss_ready: float
) -> dict:
    """The measurements every timed job reports: wall times, CPU/wall and load per run, warm-up and memory."""
    return {
        "seconds": times,
        "cpu_per_wall": [u[0] for u in usage],
        "load_1min": [u[1] for u in usage],
        "warmup_seconds": warmup,
        "rss_after_build_mib": rss_model,
        "rss_before_timed_runs_mib": rss_ready,
        "peak_rss_mib": peak_rss_mib(),
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# ---------------------------------------------------------------------------------------------------------- workers
def inference_worker(job: dict) -> dict:
    variant, batch, size = job["variant"], job["batch"], tuple(job["size"])
    heads = "plain" if variant == "fp32-plain-heads" else "low_resolution"  # plain: resize, then the 3x3 conv
    model = build_student(size, job["seed"], head_implementation=heads).eval()
    rss_model = peak_rss_mib()
    autocast = variant == "fp32+autocast"
    if variant.startswith("fast"):
        model.optimize_for_inference(
            dtype=None if variant == "fast-fp32" else torch.bfloat16, compile=variant == "fast+compile"
        )
    pixel_values = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(job["seed"] + 1))

    def forward():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(pixel_values)

    compiled = variant == "fast+compile"
    timer = None if compiled else ComponentTimer(student_groups(model))
    counter = flop_counter() if job["count_flops"] and not compiled else contextlib.nullcontext()
    start = time.perf_counter()
    with counter:
        outputs = forward()
    warmup = time.perf_counter() - start
    rss_ready = current_rss_mib()
    times, components, usage = [], [], []
    for _ in range(job["repeats"]):
        if timer:
            timer.take()
        start, cpu = time.perf_counter(), time.process_time()
        forward()
        times.append(time.perf_counter() - start)
        usage.append(((time.process_time() - cpu) / times[-1], os.getloadavg()[0]))
        if timer:
            components.append(timer.take())
    result = timing_result(times, usage, warmup, rss_model, rss_ready)
    if components:
        result["components"] = {k: statistics.median(c[k] for c in components) for k in components[0]}
    if job["outputs"]:
        torch.save({task: value.float() for task, value in outputs.task_outputs.items()}, job["outputs"])
    if isinstance(counter, torch.utils.flop_counter.FlopCounterMode):
        result["flops"] = counter.get_total_flops()
    return result


GRADIENT_PROBES = (
    "stem.layers.0.attention.qkv.weight",
    "stem.layers.11.mlp.fc2.weight",
    "teacher_paths.sam.adapters.6.up.weight",
    "routers.depth.2.gate.0.weight",
    "heads.semseg.fuse_conv.weight",
    "heads.depth.level_projections.3.weight",
)


def training_worker(job: dict) -> dict:
    variant, batch, size = job["variant"], job["batch"], tuple(job["size"])
    model = build_student(size, job["seed"]).train()
    teacher_dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    teachers = build_teachers(job["seed"] + 2, teacher_dtype)
    autocast = variant == "bf16-teachers+autocast"
    from modeling_sak.training.optimization import make_optimizer

    optimizer = make_optimizer(model, 2e-5, 1e-6)  # as train_accelerate.py
    pixel_values = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(job["seed"] + 1))
    labels = nyud_labels(batch, *size, seed=job["seed"] + 3)
    rss_model = peak_rss_mib()
    timer = ComponentTimer(student_groups(model))

    def step(record: dict | None = None) -> torch.Tensor:
        marks = [time.perf_counter()]
        teacher_features = teachers(pixel_values)
        marks.append(time.perf_counter())
        torch.manual_seed(job["seed"] + 4)  # the same gating noise in every configuration
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outputs = model(pixel_values, labels=labels, teacher_features=teacher_features)
        marks.append(time.perf_counter())
        outputs.loss.backward()
        marks.append(time.perf_counter())
        if record is not None:
            parameters = dict(model.named_parameters())
            record["loss"] = outputs.loss.item()
            record["task_losses"] = {k: v.item() for k, v in outputs.task_losses.items()}
            record["distill_total"] = sum(v.item() for v in outputs.distill_losses.values())
            record["gradients"] = {name: parameters[name].grad.float().clone() for name in GRADIENT_PROBES}
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        return torch.tensor(marks).diff()

    first: dict = {}
    counter = flop_counter() if job["count_flops"] else contextlib.nullcontext()
    start = time.perf_counter()
    with counter:
        step(first)
    warmup = time.perf_counter() - start
    rss_ready = current_rss_mib()
    times, parts, components, usage = [], [], [], []
    for _ in range(job["repeats"]):
        timer.take()
        start, cpu = time.perf_counter(), time.process_time()
        marks = step()
        times.append(time.perf_counter() - start)
        usage.append(((time.process_time() - cpu) / times[-1], os.getloadavg()[0]))
        parts.append(dict(zip(("teachers", "student_forward", "backward", "optimizer"), marks.tolist())))
        components.append(timer.take())
    result = timing_result(times, usage, warmup, rss_model, rss_ready)
    result["parts"] = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    result["student_forward_components"] = {k: statistics.median(c[k] for c in components) for k in components[0]}
    if job["outputs"]:
        torch.save(first, job["outputs"])
    if isinstance(counter, torch.utils.flop_counter.FlopCounterMode):
        result["flops"] = counter.get_total_flops()
    return result


# ----------------------------------------------------------------------------------------------------------- parent
def matmul_rate(dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of a large square matmul (median of `repeats`)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def run_job(job: dict, threads: int) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result_file:
        command = [sys.executable, __file__, "--worker", json.dumps(job), "--worker_result", result_file.name]
        subprocess.run(command, env=env, check=True)
        return json.loads(Path(result_file.name).read_text())


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def output_accuracy(outputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    errors = {task: relative_error(outputs[task], reference[task]) for task in reference}
    logits, fast_logits = reference["semseg"], outputs["semseg"]
    top2 = logits.topk(2, dim=1).values
    confident = (top2[:, 0] - top2[:, 1]) > 0.1
    agree = fast_logits.argmax(1) == logits.argmax(1)
    return {
        "relative_error": errors,
        "semseg_argmax_agreement": agree.float().mean().item(),
        "semseg_argmax_agreement_margin_0.1": agree[confident].float().mean().item() if confident.any() else None,
        "fraction_with_margin_0.1": confident.float().mean().item(),
    }


def trained_model_accuracy(path: str, num_images: int) -> dict:
    """fp32 vs the fast path (bf16 and fp32) of a trained checkpoint over rendered ToyRooms test scenes."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from modeling_sak import SAKForMultiTask
    from modeling_sak.data.toyrooms import render

    model = SAKForMultiTask.from_pretrained(path).eval()
    height, width = model.config.image_size
    scenes = [render(seed=12345, index=i, height=height, width=width) for i in range(num_images)]
    images = torch.stack([torch.from_numpy(scene["image"]).permute(2, 0, 1).float() / 255 for scene in scenes])
    mean, std = (
        torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1),
    )
    pixel_values = (images - mean) / std
    with torch.inference_mode():
        reference = model(pixel_values).task_outputs
        fast32 = SAKForMultiTask.from_pretrained(path).optimize_for_inference(dtype=None)(pixel_values).task_outputs
        fast = SAKForMultiTask.from_pretrained(path).optimize_for_inference()(pixel_values).task_outputs
    truth = torch.stack([torch.from_numpy(scene["semseg"]) for scene in scenes])
    return {
        "model": path,
        "images": f"{num_images} ToyRooms scenes rendered with seed 12345 at {height}x{width}",
        "fast": output_accuracy(fast, reference),
        "fast-fp32": output_accuracy(fast32, reference),
        "semseg_pixel_accuracy": {
            "fp32": (reference["semseg"].argmax(1) == truth).float().mean().item(),
            "fast": (fast["semseg"].argmax(1) == truth).float().mean().item(),
        },
    }


def machine_info(threads: int) -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }


def print_table(results: dict) -> None:
    floor = results["matmul_floor_gflops"]
    print(f"\nlarge-matmul floor: fp32 {floor['float32']:.0f} GFLOP/s, bf16 {floor['bfloat16']:.0f} GFLOP/s")
    for section in ("inference", "training"):
        for setting, rows in results.get(section, {}).items():
            print(f"\n{section} {setting}")
            print(
                f"{'variant':<24}{'median s':>9}{'min s':>8}{'x fp32':>7}{'x (min)':>8}{'GFLOP':>7}{'GFLOP/s':>8}"
                f"{'% bf16':>7}{'peak MiB':>9}{'max rel err':>12}{'argmax':>8}"
            )
            for variant, row in rows.items():
                accuracy = row.get("accuracy", {})
                error = max(accuracy.get("relative_error", {}).values(), default=float("nan"))
                agree = accuracy.get("semseg_argmax_agreement", float("nan"))
                print(
                    f"{variant:<24}{row['median_seconds']:>9.3f}{row['min_seconds']:>8.3f}"
                    f"{row['speedup_vs_fp32']:>7.2f}{row['speedup_vs_fp32_min']:>8.2f}"
                    f"{row.get('gflops', float('nan')):>7.0f}{row.get('achieved_gflops_per_s', float('nan')):>8.0f}"
                    f"{100 * row.get('fraction_of_bf16_floor', float('nan')):>7.0f}{row['peak_rss_mib']:>9.0f}"
                    f"{error:>12.2e}{agree:>8.4f}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads of every run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all configurations (each a fresh process)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration and round")
    parser.add_argument("--size", type=int, nargs=2, default=[448, 576], metavar=("H", "W"), help="inference size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="inference batch sizes")
    parser.add_argument(
        "--train_size",
        type=int,
        nargs=2,
        default=[224, 288],
        metavar=("H", "W"),
        help="training-step input size (the student's position embedding is sized to it)",
    )
    parser.add_argument("--train_batch", type=int, default=2, help="training batch size (the reference: 2 per GPU)")
    parser.add_argument("--compile", action="store_true", help="also time optimize_for_inference(compile=True)")
    parser.add_argument("--skip_inference", action="store_true", help="do not run part (a)")
    parser.add_argument("--skip_training", action="store_true", help="do not run part (b)")
    parser.add_argument(
        "--trained_model", help="a trained SAK checkpoint for the accuracy check (e); skipped if absent"
    )
    parser.add_argument("--trained_images", type=int, default=32, help="ToyRooms scenes for the trained-model check")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and labels")
    parser.add_argument("--output", default="bench/results/speed.json", help="JSON results file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker_result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        job = json.loads(args.worker)
        result = (inference_worker if job["kind"] == "inference" else training_worker)(job)
        result["threads"] = torch.get_num_threads()
        Path(args.worker_result).write_text(json.dumps(result))
        return

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = datetime.now(timezone.utc)
    floor = {"float32": matmul_rate(torch.float32), "bfloat16": matmul_rate(torch.bfloat16)}
    print(f"matmul floor ({args.threads} threads): {floor}")
    inference_variants = INFERENCE_VARIANTS + (("fast+compile",) if args.compile else ())
    jobs = []
    if not args.skip_inference:
        for batch in args.batches:
            for variant in inference_variants:
                jobs.append(
                    {
                        "kind": "inference",
                        "setting": f"batch {batch} at {args.size[0]}x{args.size[1]}",
                        "variant": variant,
                        "batch": batch,
                        "size": args.size,
                    }
                )
    if not args.skip_training:
        setting = f"batch {args.train_batch} at {args.train_size[0]}x{args.train_size[1]}"
        for variant in TRAINING_VARIANTS:
            jobs.append(
                {
                    "kind": "training",
                    "setting": setting,
                    "variant": variant,
                    "batch": args.train_batch,
                    "size": args.train_size,
                }
            )

    runs: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for index, job in enumerate(jobs):
                first = round_index == 0
                job = job | {
                    "seed": args.seed,
                    "repeats": args.repeats,
                    "count_flops": first,
                    "outputs": str(Path(scratch) / f"{index}.pt") if first else None,
                }
                print(
                    f"round {round_index + 1}/{args.rounds}: {job['kind']} {job['setting']} {job['variant']}",
                    flush=True,
                )
                result = run_job(job, args.threads)
                print(f"  {statistics.median(result['seconds']):.3f} s  (load {os.getloadavg()[0]:.2f})", flush=True)
                runs.setdefault((job["kind"], job["setting"], job["variant"]), []).append(
                    result | {"outputs": job["outputs"]}
                )
        results = {"inference": {}, "training": {}}
        for (kind, setting, variant), rounds in runs.items():
            seconds = [s for r in rounds for s in r["seconds"]]
            row = {
                "median_seconds": statistics.median(seconds),
                "min_seconds": min(seconds),
                "all_seconds": seconds,
                "cpu_per_wall": [c for r in rounds for c in r["cpu_per_wall"]],
                "load_1min_during_runs": [c for r in rounds for c in r["load_1min"]],
                "warmup_seconds": rounds[0]["warmup_seconds"],
                "peak_rss_mib": max(r["peak_rss_mib"] for r in rounds),
                "rss_after_build_mib": rounds[0]["rss_after_build_mib"],
                "rss_before_timed_runs_mib": rounds[0]["rss_before_timed_runs_mib"],
                "threads": rounds[0]["threads"],
            }
            for key in ("components", "parts", "student_forward_components"):
                if key in rounds[0]:
                    row[key] = {k: statistics.median(r[key][k] for r in rounds) for k in rounds[0][key]}
            if "flops" in rounds[0]:
                row["gflops"] = rounds[0]["flops"] / 1e9
            results[kind].setdefault(setting, {})[variant] = row
        for kind, settings in results.items():
            for setting, rows in settings.items():
                reference_row = rows["fp32"]
                nominal = reference_row.get("gflops")
                reference_outputs = torch.load(runs[(kind, setting, "fp32")][0]["outputs"])
                for variant, row in rows.items():
                    row["speedup_vs_fp32"] = reference_row["median_seconds"] / row["median_seconds"]
                    row["speedup_vs_fp32_min"] = reference_row["min_seconds"] / row["min_seconds"]
                    row.setdefault("gflops", rows.get("fast", {}).get("gflops"))  # compiled code is not counted
                    if row.get("gflops"):
                        row["achieved_gflops_per_s"] = row["gflops"] / row["median_seconds"]
                        row["fraction_of_bf16_floor"] = row["achieved_gflops_per_s"] / floor["bfloat16"]
                        row["fraction_of_fp32_floor"] = row["achieved_gflops_per_s"] / floor["float32"]
                    if nominal:
                        row["nominal_gflops_per_s"] = nominal / row["median_seconds"]
                        row["nominal_fraction_of_bf16_floor"] = row["nominal_gflops_per_s"] / floor["bfloat16"]
                    if variant == "fp32":
                        continue
                    outputs = torch.load(runs[(kind, setting, variant)][0]["outputs"])
                    if kind == "inference":
                        row["accuracy"] = output_accuracy(outputs, reference_outputs)
                    else:
                        row["accuracy"] = {
                            "loss": outputs["loss"],
                            "loss_fp32": reference_outputs["loss"],
                            "task_losses_relative_difference": {
                                k: abs(v - reference_outputs["task_losses"][k])
                                / abs(reference_outputs["task_losses"][k])
                                for k, v in outputs["task_losses"].items()
                            },
                            "distill_total_relative_difference": abs(
                                outputs["distill_total"] - reference_outputs["distill_total"]
                            )
                            / abs(reference_outputs["distill_total"]),
                            "gradient_relative_error": {
                                k: relative_error(v, reference_outputs["gradients"][k])
                                for k, v in outputs["gradients"].items()
                            },
                        }
    if args.trained_model and Path(args.trained_model).exists():
        results["trained_model_accuracy"] = trained_model_accuracy(args.trained_model, args.trained_images)
    elif args.trained_model:
        results["trained_model_accuracy"] = f"skipped: {args.trained_model} does not exist"

    command = "python bench/speed.py " + " ".join(sys.argv[1:])
    report = {
        "date": started.isoformat(timespec="seconds"),
        "command": command.strip(),
        "machine": machine_info(args.threads),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_minutes": (datetime.now(timezone.utc) - started).total_seconds() / 60,
        "matmul_floor_gflops": floor,
        "notes": {
            "inference": "448x576 input, eval mode, torch.inference_mode; fast = optimize_for_inference() (bf16)",
            "training": "stage 2: 3 teachers (inference mode) + student forward/backward + clip 10 + AdamW; SAM "
            "teacher at 1024x1024 whatever the student size",
            "gflops": "FLOPs counted by FlopCounterMode for that variant (the fast path does fewer), CPU flash "
            "attention included; achieved_* divide them by the median time, nominal_* divide the fp32 path's count",
            "timing": "median and min over rounds x repeats fresh-process runs; cpu_per_wall near the thread count "
            "means the run had the cores to itself, lower means other processes competed (load_1min_during_runs)",
        },
        **results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
