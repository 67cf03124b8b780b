"""A stage-2 SAK training step on CPU or GPU, float32 eager vs the fast path, split into its parts.

    python bench/train_step.py [--sizes 224x288 448x576] [--batch 2] [--threads 2] [--repeats 2] [--device cpu]

The step `train_accelerate.py` runs in stage 2, through a real `accelerate.Accelerator`: the frozen committee under
`torch.inference_mode()` (and `accelerator.autocast()`) -> student forward with `teacher_features=` and the NYUD-v2
labels -> `accelerator.backward` -> `accelerator.clip_grad_norm_` (10) -> AdamW step. A ViT-B/16 student with
teachers of DINOv2-B/14, CLIP-B/16 and SAM-B shape (SAM at its native 1024 x 1024, windowed attention) and the four
NYUD-v2 tasks, all with random weights built from transformers configs at a realistic initialisation (seeded; nothing
is downloaded). Two variants:

- `fp32-eager`: float32 teachers with `fast_path=False`, eager (explicit softmax) attention in teachers and student,
  `mixed_precision="no"`, the reference's head arithmetic (`head_implementation="plain"`) and AdamW's per-parameter
  loop;
- `fast`: bfloat16 teachers with `fast_path=True`, SDPA attention, `mixed_precision="bf16"` (the student's forward
  under bf16 autocast as accelerate applies it; float32 master weights), the default low-resolution heads and
  `make_optimizer`'s fused AdamW, as `train_accelerate.py` trains.

Every (size, variant) runs in a fresh subprocess (its peak memory is its own: `ru_maxrss` on CPU,
`torch.cuda.max_memory_allocated` on CUDA): one warm-up step, during which FLOPs are counted per part with
`FlopCounterMode`, then `--repeats` timed steps (CUDA timings synchronise at every part boundary); medians are
reported. Achieved FLOP/s is compared with the large-matmul rate in float32 and bfloat16 measured in the same process
right after its timed steps (on shared cores the rate moves with the load).
`fast_path` is a run-time attribute of the teachers from the fast-teacher change; where the teachers do not have it
yet, the results say so (`fast_teacher_path_available: false`) and the fast variant runs without it.
Results go to bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from speed import flop_counter, machine_info, nyud_labels
from torch import nn


REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fp32-eager", "fast")
PARTS = ("teachers", "student_forward", "backward", "optimizer")
TEACHERS = ("dinov2", "clip", "sam")
# (width, heads, depth) of the stems and teachers; ViT-S/B students learn from base teachers, ViT-L from large ones.
WIDTHS = {"tiny": (32, 2, 4), "tiny64": (64, 4, 4), "base": (768, 12, 12), "large": (1024, 16, 24)}
# Below this median std of the Linear/Conv weights a random model is "near zero": transformers' SamVisionConfig
# defaults to initializer_range=1e-10, whose float32 activations go subnormal and run about 10x slower on CPU.
MIN_WEIGHT_STD = 1e-3
REALISTIC_INIT = 0.02


# ----------------------------------------------------------------------------------------------------------- models
def check_realistic_weights(name: str, model: nn.Module) -> float:
    """The median std of `model`'s Linear/Conv weights; ValueError when it is near zero (< `MIN_WEIGHT_STD`)."""
    stds = [m.weight.detach().float().std() for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    median = torch.stack(stds).median().item()
    if median < MIN_WEIGHT_STD:
        raise ValueError(
            f"{name}: the median std of its Linear/Conv weights is {median:.1e} (< {MIN_WEIGHT_STD:g}): random weights "
            "this close to zero give subnormal float32 activations (about 10x slower on CPU) and meaningless "
            f"timings; build its config with initializer_range={REALISTIC_INIT} (transformers' SamVisionConfig "
            "defaults to 1e-10)"
        )
    return median


def stem_config(shape: str, depth: int | None = None) -> dict:
    """A ViT/16 stem of `shape` ("tiny", "base" = ViT-B, "large" = ViT-L), optionally with `depth` blocks."""
    width, heads, full_depth = WIDTHS[shape]
    return {
        "model_type": "vit",
        "hidden_size": width,
        "num_hidden_layers": depth or full_depth,
        "num_attention_heads": heads,
        "intermediate_size": 4 * width,
        "patch_size": 16,
        "layer_norm_eps": 1e-6,
    }


def teacher_configs(
    shape: str, depth: int | None = None, sam_size: int | None = None, attn_implementation: str = "sdpa"
) -> dict:
    """transformers configs of DINOv2/14, CLIP (/16, /14 for large) and SAM teachers of `shape` ("tiny", "base",
    "large", "tiny64"), optionally `depth` blocks deep, initialised at std `REALISTIC_INIT`. SAM runs at `sam_size` (default
    1024 x 1024, 128 for the tiny shapes; below 1024 its windows are 4 patches wide instead of 14, and DINOv2/CLIP are saved at
    small grids too); its global-attention blocks are the output levels (12 -> [2, 5, 8, 11] as SAM-B, 24 ->
    [5, 11, 17, 23] as SAM-L)."""
    from transformers import CLIPVisionConfig, Dinov2Config, SamVisionConfig

    from modeling_sak.remote_code.configuration_sak import default_out_indices

    width, heads, full_depth = WIDTHS[shape]
    depth = depth or full_depth
    sam_size = sam_size or (128 if shape.startswith("tiny") else 1024)
    common = {
        "hidden_size": width,
        "num_hidden_layers": depth,
        "num_attention_heads": heads,
        "initializer_range": REALISTIC_INIT,
        "attn_implementation": attn_implementation,
    }
    return {
        "dinov2": Dinov2Config(**common, image_size=518 if sam_size == 1024 else 56, patch_size=14),
        "clip": CLIPVisionConfig(
            **common,
            intermediate_size=4 * width,
            image_size=224 if sam_size == 1024 else 64,
            patch_size=14 if shape == "large" else 16,
        ),
        "sam": SamVisionConfig(
            **common,
            mlp_dim=4 * width,
            image_size=sam_size,
            patch_size=16,
            window_size=14 if sam_size == 1024 else 4,
            global_attn_indexes=default_out_indices(depth),
        ),
    }


def build_teachers(
    configs: dict,
    dtype: torch.dtype,
    fast_path: bool,
    device: torch.device | str = "cpu",
    seed: int = 0,
):
    """A frozen `SAKTeachers` committee of random transformers models, and whether every teacher has `fast_path`.

    Weights are checked by `check_realistic_weights`; `fast_path` is set on every teacher that has the attribute
    (teachers from before the fast-teacher change have none and always run transformers' forward).
    """
    from transformers import CLIPVisionModel, Dinov2Model, SamVisionModel

    from modeling_sak.teachers.committee import SAKTeacher, SAKTeachers

    classes = {"dinov2": Dinov2Model, "clip": CLIPVisionModel, "sam": SamVisionModel}
    torch.manual_seed(seed)
    teachers, available = {}, []
    for name, config in configs.items():
        with torch.device(device):
            model = classes[name](config)
        check_realistic_weights(f"teacher '{name}' ({type(model).__name__})", model)
        teacher = SAKTeacher(name, model.to(dtype).eval(), name, None)
        available.append(hasattr(teacher, "fast_path"))
        if available[-1]:
            teacher.fast_path = fast_path
        teachers[name] = teacher
    return SAKTeachers(teachers), all(available)


def build_student(
    shape: str,
    image_size: tuple[int, int],
    teacher_width: int,
    depth: int | None = None,
    attn: str = "sdpa",
    seed=0,
    head_implementation: str = "low_resolution",
):
    """A random `SAKForMultiTask` (NYUD-v2 tasks, three teachers of `teacher_width`, aligners where wider); the same
    weights for either `head_implementation`."""
    from modeling_sak import SAKConfig, SAKForMultiTask

    torch.manual_seed(seed)
    stem = stem_config(shape, depth)
    config = SAKConfig(
        stem_config=stem,
        teachers=dict.fromkeys(TEACHERS, teacher_width),
        tasks="nyud_v2",
        image_size=list(image_size),
        use_aligners=teacher_width != stem["hidden_size"],
        attn_implementation=attn,
        head_implementation=head_implementation,
    )
    model = SAKForMultiTask(config)
    check_realistic_weights(f"student ({shape})", model)
    return model


# ----------------------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak: `torch.cuda.max_memory_allocated` on CUDA, peak resident memory (`ru_maxrss`) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def matmul_rate(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """GFLOP/s of a large square matmul on `device` (median of `repeats`)."""
    size = 8192 if device.type == "cuda" else 4096
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def stage2_step(
    model, teachers, optimizer, accelerator, pixel_values, labels, seed: int, counters: dict | None = None
) -> tuple[float, dict[str, float]]:
    """One stage-2 step as `train_accelerate.py` runs it; returns the loss and the seconds of each part of `PARTS`
    (synchronised on CUDA). With `counters` (`{part: FlopCounterMode}`) each part runs under its counter."""
    device = pixel_values.device
    counters = counters or {}
    seconds = {}

    def timed(part, function):
        synchronize(device)
        start = time.perf_counter()
        with counters.get(part, contextlib.nullcontext()):
            result = function()
        synchronize(device)
        seconds[part] = time.perf_counter() - start
        return result

    def teacher_targets():
        with accelerator.autocast():
            return teachers(pixel_values)

    def forward():
        torch.manual_seed(seed)  # the same gating noise in every step and variant
        return model(pixel_values, labels=labels, teacher_features=teacher_features)

    def update():
        accelerator.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    teacher_features = timed("teachers", teacher_targets)
    outputs = timed("student_forward", forward)
    timed("backward", lambda: accelerator.backward(outputs.loss))
    timed("optimizer", update)
    return outputs.loss.item(), seconds


def worker(job: dict) -> dict:
    """One (size, variant) configuration in this fresh process: build, warm up (counting FLOPs), time."""
    from accelerate import Accelerator

    device = torch.device(job["device"])
    fast = job["variant"] == "fast"
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if fast else "no")
    size, batch, seed = tuple(job["size"]), job["batch"], job["seed"]
    attn = "sdpa" if fast else "eager"
    shape = job.get("shape", "base")
    heads = "low_resolution" if fast else "plain"  # plain: the reference's resize-then-conv heads
    model = build_student(shape, size, WIDTHS[shape][0], attn=attn, seed=seed, head_implementation=heads).train()
    teachers, fast_available = build_teachers(
        teacher_configs(shape, attn_implementation=attn),
        torch.bfloat16 if fast else torch.float32,
        fast_path=fast,
        device=accelerator.device,
        seed=seed + 2,
    )
    if fast:  # the optimizer of train_accelerate.py: fused AdamW over the training parameter groups
        from modeling_sak.training.optimization import make_optimizer

        optimizer = make_optimizer(model, 2e-5, 1e-6)
    else:  # the reference's per-parameter AdamW loop
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=1e-6, foreach=False)
    model, optimizer = accelerator.prepare(model, optimizer)
    pixel_values = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed + 1))
    pixel_values = pixel_values.to(accelerator.device)
    labels = {k: v.to(accelerator.device) for k, v in nyud_labels(batch, *size, seed=seed + 3).items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    counters = {part: flop_counter() for part in PARTS[:3]}
    start = time.perf_counter()
    first_loss, _ = stage2_step(model, teachers, optimizer, accelerator, pixel_values, labels, seed + 4, counters)
    warmup = time.perf_counter() - start
    steps, usage = [], []
    for _ in range(job["repeats"]):
        start, cpu = time.perf_counter(), time.process_time()
        steps.append(stage2_step(model, teachers, optimizer, accelerator, pixel_values, labels, seed + 4))
        usage.append(((time.process_time() - cpu) / (time.perf_counter() - start), os.getloadavg()[0]))
    totals = [sum(parts.values()) for _, parts in steps]
    peak = peak_memory_mib(accelerator.device)
    # The matmul rate in this process right after its timed steps (on shared cores the parent's can differ), measured
    # after the peak memory was read so that its matrices do not count.
    rates = {name: matmul_rate(getattr(torch, name), accelerator.device) for name in ("float32", "bfloat16")}
    return {
        "seconds": totals,
        "median_seconds": statistics.median(totals),
        "parts": {part: statistics.median(parts[part] for _, parts in steps) for part in PARTS},
        "gflops": {part: counter.get_total_flops() / 1e9 for part, counter in counters.items()},
        "warmup_seconds": warmup,
        "matmul_rate_gflops": rates,
        "cpu_per_wall": [u[0] for u in usage],
        "load_1min": [u[1] for u in usage],
        "peak_memory_mib": peak,
        "first_loss": first_loss,
        "losses": [loss for loss, _ in steps],
        "fast_teacher_path_available": fast_available,
        "teachers_on_fast_path": {
            name: bool(getattr(teacher, "uses_fast_path", False)) for name, teacher in teachers.teachers.items()
        },
        "teacher_dtype": str(next(teachers.teachers.parameters()).dtype),
        "attn_implementation": attn,
        "mixed_precision": accelerator.mixed_precision,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------------------- parent
def run_job(job: dict, threads: int, script: str = __file__) -> dict:
    """`script --worker JOB` (default: this benchmark's `worker(job)`) in a fresh process with `threads` intra-op
    threads, importing this checkout's modeling_sak; the worker writes its result to `--worker_result`."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = os.environ | {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": path,
    }
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result_file:
        command = [sys.executable, script, "--worker", json.dumps(job), "--worker_result", result_file.name]
        subprocess.run(command, env=env, check=True)
        return json.loads(Path(result_file.name).read_text())


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 224x288") from None
    if height % 16 or width % 16:
        raise argparse.ArgumentTypeError(f"size {text!r}: height and width must be multiples of the patch size 16")
    return height, width


def summarise(rows: dict, floor: dict) -> None:
    """Add speed-ups against fp32-eager and achieved FLOP/s (each variant's own count) to every row, in place."""
    reference = rows.get("fp32-eager")
    for row in rows.values():
        total_gflops = sum(row["gflops"].values())
        row["gflops_total"] = total_gflops
        row["achieved_gflops_per_s"] = total_gflops / row["median_seconds"]
        rates = row.get("matmul_rate_gflops", floor)  # measured in the configuration's own process
        row["fraction_of_fp32_matmul_rate"] = row["achieved_gflops_per_s"] / rates["float32"]
        row["fraction_of_bf16_matmul_rate"] = row["achieved_gflops_per_s"] / rates["bfloat16"]
        row["achieved_gflops_per_s_by_part"] = {
            part: row["gflops"][part] / row["parts"][part] for part in row["gflops"] if row["parts"][part]
        }
        if reference:
            row["speedup_vs_fp32_eager"] = reference["median_seconds"] / row["median_seconds"]
            row["speedup_by_part"] = {part: reference["parts"][part] / row["parts"][part] for part in PARTS}


def print_table(report: dict) -> None:
    floor = report["matmul_rate_gflops"]
    print(f"\nlarge-matmul rate (parent): fp32 {floor['float32']:.0f} GFLOP/s, bf16 {floor['bfloat16']:.0f} GFLOP/s")
    for setting, rows in report["results"].items():
        print(f"\n{setting}")
        print(
            f"{'variant':<12}{'step s':>8}{'x fp32':>8}{'teachers':>10}{'forward':>9}{'backward':>10}{'optim':>7}"
            f"{'GFLOP':>7}{'GFLOP/s':>9}{'% bf16':>8}{'peak MiB':>10}"
        )
        for variant, row in rows.items():
            parts = row["parts"]
            print(
                f"{variant:<12}{row['median_seconds']:>8.2f}{row.get('speedup_vs_fp32_eager', float('nan')):>8.2f}"
                f"{parts['teachers']:>10.2f}{parts['student_forward']:>9.2f}{parts['backward']:>10.2f}"
                f"{parts['optimizer']:>7.2f}{row['gflops_total']:>7.0f}{row['achieved_gflops_per_s']:>9.0f}"
                f"{100 * row['fraction_of_bf16_matmul_rate']:>8.0f}{row['peak_memory_mib']:>10.0f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", type=parse_size, nargs="+", default=[(224, 288), (448, 576)], help="HxW input sizes"
    )
    parser.add_argument("--batch", type=int, default=2, help="training batch size (the reference: 2 per GPU)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op CPU threads of every run")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per configuration after the warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="what to run")
    parser.add_argument(
        "--shape", choices=sorted(WIDTHS), default="base", help="student and teacher shape (tiny: a smoke test)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and labels")
    parser.add_argument("--output", default="bench/results/train_step.json", help="JSON results file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker_result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = worker(json.loads(args.worker))
        Path(args.worker_result).write_text(json.dumps(result))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch; use --device cpu")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: give at least 1 timed step")

    torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc)
    floor = {name: matmul_rate(getattr(torch, name), device) for name in ("float32", "bfloat16")}
    print(f"matmul rate on {device} ({args.threads} threads): {floor}", flush=True)
    results = {}
    for height, width in args.sizes:
        setting = f"batch {args.batch} at {height}x{width}"
        rows = results.setdefault(setting, {})
        for variant in args.variants:
            job = {
                "variant": variant,
                "size": [height, width],
                "batch": args.batch,
                "repeats": args.repeats,
                "seed": args.seed,
                "device": args.device,
                "shape": args.shape,
            }
            print(f"{setting}: {variant}", flush=True)
            rows[variant] = run_job(job, args.threads)
            print(f"  {rows[variant]['median_seconds']:.2f} s (load {os.getloadavg()[0]:.2f})", flush=True)
        summarise(rows, floor)

    info = machine_info(args.threads)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    fast_rows = [rows["fast"] for rows in results.values() if "fast" in rows]
    report = {
        "date": started.isoformat(timespec="seconds"),
        "command": ("python bench/train_step.py " + " ".join(sys.argv[1:])).strip(),
        "device": args.device,
        "machine": info,
        "wall_minutes": (datetime.now(timezone.utc) - started).total_seconds() / 60,
        "matmul_rate_gflops": floor,
        "fast_teacher_path_available": all(row["fast_teacher_path_available"] for row in fast_rows)
        if fast_rows
        else None,
        "notes": {
            "step": "stage 2 through accelerate: teachers (inference mode, accelerator.autocast) + student forward "
            "with labels and teacher_features + accelerator.backward + clip 10 + AdamW; SAM at 1024x1024 whatever "
            "the student size",
            "variants": "fp32-eager: fp32 teachers fast_path=False, eager attention, mixed_precision=no; fast: bf16 "
            "teachers fast_path=True, SDPA, mixed_precision=bf16",
            "gflops": "counted by FlopCounterMode per part in the warm-up step (each variant its own count: the fast "
            "teacher path counts differently; optimizer not counted); achieved = total / median step time, compared "
            "with the matmul rate measured in the same worker process right after its timed steps",
            "contention": "cpu_per_wall near the thread count means the cores were free; load_1min is the machine's "
            "load during the timed steps (other jobs shared these cores)",
            "peak_memory_mib": "CPU: the worker process's ru_maxrss (includes Python and the libraries); CUDA: "
            "torch.cuda.max_memory_allocated",
        },
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
