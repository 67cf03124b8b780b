"""SAK against the authors' model, side by side in one run: a stage-2 training step and an inference forward.

    python bench/vs_reference.py [--threads 2] [--rounds 2] [--repeats 3] [--train_size 224x288] [--batch 2]
                                 [--inference_size 448x576]

A ViT-B/16 student with three ViT-B-wide teachers (DINOv2-B/14, CLIP-B/16, SAM-B at 1024 x 1024) and the four NYUD-v2
tasks, random weights at a realistic initialisation (seeded; nothing is downloaded). The authors' model is the one
`tests/reference_sak.py` restates (their modules and forward order), run as their code runs it: float32 weights under
bfloat16 autocast, float32 teachers (transformers' forward) under the same autocast, `torch.optim.AdamW` with its
defaults (the per-parameter loop on CPU), gradient clipping at 10, their loss as their code composes it
(`flops.reference_loss`).

Training variants (`--train_size`, batch `--batch`):
- `reference-bf16`: the authors' model as above, glibc's default malloc;
- `reference-bf16-tuned-allocator`: the same with the malloc settings SAK's commands use
  (`modeling_sak.training.cpu_allocator`), a control: how much of SAK's lead is the allocator;
- `sak-plain-loop`: SAK as it trained before the low-resolution heads, the fused optimizer and the allocator settings
  (`head_implementation="plain"`, the loop AdamW), with the bf16 fast teacher path and bf16 autocast;
- `sak-default-allocator`: SAK as below with glibc's default malloc;
- `sak`: SAK as `train_accelerate.py` trains it now (low-resolution heads, `make_optimizer`'s fused AdamW,
  `cpu_allocator: tuned`), same teachers and autocast.
Each step is split into teachers, student forward (with the loss), backward, and clipping + optimizer step; "student"
is the sum of the last three.

Inference variants (`--inference_size`, batch 1, `torch.inference_mode()`): `reference-fp32`, `reference-bf16`
(autocast), `reference-bf16-tuned-allocator` (the control), `sak-plain-fp32` (eager float32 with the plain heads, the
default malloc), `sak-fp32` (eager float32, default heads), `sak-deployed-default-allocator` and `sak-deployed`
(`optimize_for_inference()`, bfloat16); `sak-fp32` and `sak-deployed` with the malloc settings, as `sak-predict` and
`sak-evaluate` run.

Every (variant) runs in a fresh subprocess with `--threads` intra-op threads, `--rounds` times in alternation (one
warm-up, then `--repeats` timed runs each); medians over all timed runs are reported, with each round's median so
that the load drift of shared cores stays visible. Results go to bench/results/vs_reference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from speed import machine_info, nyud_labels
from train_step import build_student, build_teachers, run_job, teacher_configs


REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINING_VARIANTS = (
    "reference-bf16",
    "reference-bf16-tuned-allocator",
    "sak-plain-loop",
    "sak-default-allocator",
    "sak",
)
INFERENCE_VARIANTS = (
    "reference-fp32",
    "reference-bf16",
    "reference-bf16-tuned-allocator",
    "sak-plain-fp32",
    "sak-fp32",
    "sak-deployed-default-allocator",
    "sak-deployed",
)
# What each variant's process does with glibc's malloc (`modeling_sak.training.cpu_allocator`): SAK as its commands
# run it (train_accelerate.py, sak-evaluate, sak-predict) keeps freed memory mapped; the reference and SAK as it was
# run before keep glibc's defaults; the two named controls swap that, so the allocator's share of each ratio is visible.
TUNED_ALLOCATOR = ("sak", "sak-fp32", "sak-deployed", "reference-bf16-tuned-allocator")
STEP_PARTS = ("teachers", "forward", "backward", "optimizer")


def model_variant(variant: str) -> str:
    """The variant without its allocator suffix (the model and precision it runs)."""
    return variant.removesuffix("-tuned-allocator").removesuffix("-default-allocator")


def timed(function) -> tuple[object, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def training_worker(job: dict) -> dict:
    from flops import build_reference, reference_loss

    from modeling_sak.training.optimization import make_optimizer, parameter_groups

    size, batch, seed = tuple(job["size"]), job["batch"], job["seed"]
    variant = model_variant(job["variant"])
    reference = variant == "reference-bf16"
    heads = "plain" if variant == "sak-plain-loop" else "low_resolution"
    student = build_student("base", size, 768, seed=seed, head_implementation=heads).train()
    config = student.config
    if reference:
        model = build_reference(size, seed).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=1e-6)
    else:
        if variant == "sak-plain-loop":
            optimizer = torch.optim.AdamW(parameter_groups(student, 1e-6), lr=2e-5)
        else:
            optimizer = make_optimizer(student, 2e-5, 1e-6)
        model = student
    teachers, _ = build_teachers(
        teacher_configs("base"), torch.float32 if reference else torch.bfloat16, fast_path=not reference, seed=seed + 2
    )
    pixel_values = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed + 1))
    labels = nyud_labels(batch, *size, seed=seed + 3)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731

    def step() -> dict[str, float]:
        seconds = {}
        with autocast():  # SAKTeachers runs under inference mode and returns ordinary tensors
            teacher_features, seconds["teachers"] = timed(lambda: teachers(pixel_values))
        torch.manual_seed(seed + 4)  # the same gating noise in every step
        with autocast():
            if reference:
                loss, seconds["forward"] = timed(
                    lambda: reference_loss(model, config, pixel_values, labels, teacher_features)
                )
            else:
                loss, seconds["forward"] = timed(
                    lambda: model(pixel_values, labels=labels, teacher_features=teacher_features).loss
                )
        _, seconds["backward"] = timed(loss.backward)

        def update():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        _, seconds["optimizer"] = timed(update)
        return seconds

    step()  # warm-up
    steps = [step() for _ in range(job["repeats"])]
    return {"steps": steps}


def inference_worker(job: dict) -> dict:
    from flops import build_reference

    size, seed, variant = tuple(job["size"]), job["seed"], model_variant(job["variant"])
    if variant.startswith("reference"):
        model = build_reference(size, seed).eval()
    else:
        heads = "plain" if variant == "sak-plain-fp32" else "low_resolution"
        model = build_student("base", size, 768, seed=seed, head_implementation=heads).eval()
        if variant == "sak-deployed":
            model.optimize_for_inference()
    pixel_values = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed + 1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "reference-bf16")

    def forward() -> float:
        with torch.inference_mode(), autocast:
            return timed(lambda: model(pixel_values))[1]

    forward()
    return {"seconds": [forward() for _ in range(job["repeats"])]}


def parse_size(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def summarise_training(runs: dict[str, list[dict]]) -> dict:
    rows = {}
    for variant, rounds in runs.items():
        steps = [s for r in rounds for s in r["steps"]]
        student = [s["forward"] + s["backward"] + s["optimizer"] for s in steps]
        rows[variant] = {
            "parts": {part: statistics.median(s[part] for s in steps) for part in STEP_PARTS},
            "student_seconds": statistics.median(student),
            "step_seconds": statistics.median(sum(s.values()) for s in steps),
            "student_seconds_by_round": [
                statistics.median(s["forward"] + s["backward"] + s["optimizer"] for s in r["steps"]) for r in rounds
            ],
            "timed_steps": len(steps),
        }
    reference = rows["reference-bf16"]
    for row in rows.values():
        row["student_ratio_to_reference"] = row["student_seconds"] / reference["student_seconds"]
        row["step_ratio_to_reference"] = row["step_seconds"] / reference["step_seconds"]
    return rows


def summarise_inference(runs: dict[str, list[dict]]) -> dict:
    rows = {}
    for variant, rounds in runs.items():
        seconds = [s for r in rounds for s in r["seconds"]]
        rows[variant] = {
            "seconds": statistics.median(seconds),
            "seconds_by_round": [statistics.median(r["seconds"]) for r in rounds],
        }
    for row in rows.values():
        row["ratio_to_reference_bf16"] = row["seconds"] / rows["reference-bf16"]["seconds"]
        row["ratio_to_reference_fp32"] = row["seconds"] / rows["reference-fp32"]["seconds"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op CPU threads of every run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of alternating variants")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant and round, after a warm-up")
    parser.add_argument("--train_size", type=parse_size, default=(224, 288), help="HxW of the training step")
    parser.add_argument("--batch", type=int, default=2, help="batch of the training step")
    parser.add_argument("--inference_size", type=parse_size, default=(448, 576), help="HxW of inference (batch 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    parser.add_argument("--output", default="bench/results/vs_reference.json", help="JSON results file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker_result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from modeling_sak.training.cpu_allocator import configure_cpu_allocator

        job = json.loads(args.worker)
        configure_cpu_allocator(
            "tuned" if job["variant"] in TUNED_ALLOCATOR else "default"
        )  # before the worker's tensors
        result = (training_worker if job["kind"] == "training" else inference_worker)(job)
        Path(args.worker_result).write_text(json.dumps(result))
        return

    started = time.perf_counter()
    load_before = os.getloadavg()
    training = {v: [] for v in TRAINING_VARIANTS}
    inference = {v: [] for v in INFERENCE_VARIANTS}
    for round_index in range(args.rounds):
        for variant in TRAINING_VARIANTS:
            job = {"kind": "training", "variant": variant, "size": args.train_size, "batch": args.batch}
            job |= {"seed": args.seed, "repeats": args.repeats}
            training[variant].append(run_job(job, args.threads, __file__))
            print(f"round {round_index + 1} training {variant}: {training[variant][-1]['steps'][-1]}", flush=True)
        for variant in INFERENCE_VARIANTS:
            job = {"kind": "inference", "variant": variant, "size": args.inference_size, "seed": args.seed}
            job |= {"repeats": 2 * args.repeats}
            inference[variant].append(run_job(job, args.threads, __file__))
            print(f"round {round_index + 1} inference {variant}: {inference[variant][-1]['seconds']}", flush=True)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": machine_info(args.threads),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_minutes": (time.perf_counter() - started) / 60,
        "training_step": {
            "size": list(args.train_size),
            "batch": args.batch,
            "variants": summarise_training(training),
            "raw": training,
        },
        "inference": {"size": list(args.inference_size), "batch": 1, "variants": summarise_inference(inference)},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")

    print(f"\ntraining step {args.train_size}, batch {args.batch}: median seconds")
    print(
        f"{'variant':<32}"
        + "".join(f"{p:>10}" for p in STEP_PARTS)
        + f"{'student':>9}{'x ref':>7}{'step':>8}{'x ref':>7}"
    )
    for name, row in report["training_step"]["variants"].items():
        cells = "".join(f"{row['parts'][p]:>10.2f}" for p in STEP_PARTS)
        print(
            f"{name:<32}{cells}{row['student_seconds']:>9.2f}{row['student_ratio_to_reference']:>7.2f}"
            f"{row['step_seconds']:>8.2f}{row['step_ratio_to_reference']:>7.2f}"
        )
    print(f"\ninference {args.inference_size}, batch 1: median seconds")
    for name, row in report["inference"]["variants"].items():
        print(
            f"{name:<32}{row['seconds']:>8.3f}  x ref-bf16 {row['ratio_to_reference_bf16']:.2f}  "
            f"x ref-fp32 {row['ratio_to_reference_fp32']:.2f}"
        )
    print(f"results written to {args.output}")


if __name__ == "__main__":
    main()
